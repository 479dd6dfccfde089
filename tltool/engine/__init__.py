"""The training engine: preparing a run, the two stages, the feature cache, callbacks and resume state.

`finetune`, `tune` trials and `export` all set a run up through `engine.setup.prepare_run` and train through
`engine.stages.train_stages`, so a trial trains exactly as `finetune` does.
"""
