"""Datasets: loading (`loader`: jsonl / parquet / HF dirs with key mapping; `jsonl`: the row schema),
chat templates, sequence packing, the synthetic reasoning task.

`loader`, `jsonl` and `synthetic` import no torch; `chat` needs a HF tokenizer; `packing` needs torch.
"""
