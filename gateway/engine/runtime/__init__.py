"""What every engine part runs on: the device's compute thread, loading a checkpoint, packed weights,
the observer the gateway's metrics implement, and prompt-length bounds."""
