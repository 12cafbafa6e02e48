"""Training data: `pretrain` (token shards and packed, resumable batches) and `sft` (chat data).

`IGNORE_INDEX` is the target value that carries no loss (PyTorch's and Hugging Face's -100): the chat data
writes it for prompt, header and padding positions, and every loss of `llama3.train` skips it."""

IGNORE_INDEX = -100
