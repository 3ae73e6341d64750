"""The training machinery shared by pre-training and fine-tuning: the DeepSpeed engine, the loop,
checkpoints, contrastive accumulation, metrics, the output-dir lock, a rank's process (launcher,
signals) and start-up checks."""
