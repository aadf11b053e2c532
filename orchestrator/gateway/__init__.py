"""The data path, served from memory: the catalog (keys, models, what serves each), limits, the flow of a call
(authenticate, admit, hold, open with failover, account), the priority queue, the upstream session and the loop
guard, engine URLs and token counting. Imports `billing` and below."""
