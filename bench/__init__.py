"""`make bench` (= `python -m bench`): the served throughput and latency of akidb-embed
against sentence-transformers on the same model and corpus, in the same run."""
