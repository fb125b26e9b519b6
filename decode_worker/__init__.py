"""The decode worker: reserve → receive KV → join the batch → stream tokens; local prefill too."""
