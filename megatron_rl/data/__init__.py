"""Datasets: jsonl loading, chat templates, sequence packing, the synthetic reasoning task.

`jsonl` and `synthetic` import no torch; `chat` needs a HF tokenizer; `packing` needs torch.
"""
