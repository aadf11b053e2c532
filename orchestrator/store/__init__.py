"""All SQL: the tables, the database engines and migrations, pages of rows, and one store per aggregate (the
fleet's models and replicas, API keys, the connector's accounts, call records, bots, LlmEndpoint's tasks, external
endpoints), plus the gateway's one-read view, the table browser and the change feed between processes. One method
is one transaction. Imports `platform` and `domain`."""
