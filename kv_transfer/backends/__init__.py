"""KV transfer backends; each module defines ``BACKEND`` (see kv_transfer.plane)."""
