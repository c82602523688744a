"""Training: the machinery every training command shares, and the commands' recipes.

run.py starts a run (the arguments every command has, the folder, the batch and learning rate, the schedule, the
optimizer, resume, the loader) and loop.py trains it; checkpoint.py and schedule.py are its state and its
arithmetic. pretrain.py and finetune.py hold only what differs: the model, the data set, the loss, the epoch end
and what the config records. A new training command is one more such file.
"""
