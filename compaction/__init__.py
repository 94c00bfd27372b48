"""KV compaction (Attention Matching, token eviction): see issue #3. Imports only kvstore."""
