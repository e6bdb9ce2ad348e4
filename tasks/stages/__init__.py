"""The pipeline's stages, one module each, in pipeline order (tasks/registry.py lists them):

    download, extract, normalize, clean, dedup, tokenizer, shard      the data half (CPU workers or Ray)
    pretrain, sft, dpo, reward, ppo, grpo, distill, distill_data,
    distill_sft                                                       training (tasks/train/stage.py runs each;
                                                                      distill_data asks a teacher, trains nothing)
    eval, export                                                      every model judged; the last one shipped

A stage module is a recipe: its settings, its config slice of a profile (what its cache key
hashes), and `run(config, inputs, out)`. It imports libraries (tasks/corpus, tasks/train, model,
storage), never another stage.
"""
