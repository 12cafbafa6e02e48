"""Training data: `pretrain` (token shards and packed, resumable batches) and `sft` (chat data)."""
