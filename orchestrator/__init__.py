"""The domain: settings, tables, store, replica lifecycle, jobs and the composition root."""
