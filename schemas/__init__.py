"""Ferry's wire contract: versioned messages and the names of subjects and buckets."""
