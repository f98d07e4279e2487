# The seed library's README "Quick Start" (seed 000: "Basic Usage with PyTorch DCP Async Save"
# and "Loading Checkpoints"), copied verbatim. Only import lines and the minimum CPU changes
# differ; every changed line carries a "# CHANGED:" comment.
# Lint and formatting are off for these files: they stay as the seed wrote them.
# ruff: noqa
# fmt: off
import os  # CHANGED: the seed uses os and time without importing them
import time  # CHANGED: the seed uses os and time without importing them

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import async_save, load
from tierckpt.compat.sagemaker import SageMakerCheckpointConfig, SageMakerTieredStorageWriter, SageMakerTieredStorageReader  # CHANGED: import from tierckpt


class MyModel(torch.nn.Linear):  # CHANGED: the seed leaves MyModel undefined
    def __init__(self):  # CHANGED: the seed leaves MyModel undefined
        super().__init__(1000, 10)  # CHANGED: the seed leaves MyModel undefined


epoch = 0  # CHANGED: the seed leaves epoch undefined

# Initialize distributed training
dist.init_process_group(backend="gloo")  # CHANGED: nccl -> gloo (CPU)

# Configure checkpointing
checkpoint_config = SageMakerCheckpointConfig(
    # Unique ID for your training job 
    # Allowed characters in ID include: alphanumeric, hyphens, and underscores
    namespace=os.environ.get('TRAINING_JOB_NAME', f'job-{int(time.time())}'), 
    
    # Number of distributed processes/available GPUs
    world_size=dist.get_world_size(), 
    
    # S3 storage location, required for SageMakerTieredStorageReader for read fallbacks
    # Required for SageMakerTieredStorageWriter when save_to_s3 is True
    s3_tier_base_path="s3://my-bucket/checkpoints"

)

# Your model and optimizer
model = MyModel()
optimizer = torch.optim.AdamW(model.parameters())

# Training loop
future = None
in_memory_ckpt_freq = 10
s3_ckpt_freq = 50

for training_step in range(1000):
    # ... training code ...
    
    # Save checkpoint
    if (training_step % in_memory_ckpt_freq == 0 or 
        training_step % s3_ckpt_freq == 0):
        # Create state dictionary
        state_dict = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": training_step,
            "epoch": epoch
        }
        
        # Create storage writer for current step
        checkpoint_config.save_to_s3 = training_step % s3_ckpt_freq == 0
        storage_writer = SageMakerTieredStorageWriter(
            checkpoint_config=checkpoint_config,
            step=training_step
        )

        # wait for previous checkpoint to get completed
        if future is not None:
            exc = future.exception()
            if exc:
                print(f"Failure in saving previous checkpoint:{str(exc)}")
                #Handle failures as required
            else:
                result = future.result()
                #Process results from save, if required
        
        # Async save checkpoint using PyTorch DCP
        future = async_save(state_dict=state_dict, storage_writer=storage_writer)
        
        # Continue training while checkpoint saves in background

# Create state dictionary template
state_dict = {
    "model": model.state_dict(),
    "optimizer": optimizer.state_dict(),
    "step": 0,
    "epoch": 0
}

# Load latest checkpoint
storage_reader = SageMakerTieredStorageReader(checkpoint_config=checkpoint_config)
load(state_dict, storage_reader=storage_reader)

# Load specific checkpoint step
storage_reader = SageMakerTieredStorageReader(
    checkpoint_config=checkpoint_config, 
    step=500 # Or don't pass step if you have to load the latest available step.
)
try:
    load(state_dict, storage_reader=storage_reader)
except BaseException as e:
    print(f"Checkpoint load failed: {str(e)}")
    # Add additional exception handling

dist.destroy_process_group()  # CHANGED: end the standalone run cleanly; without it gloo's teardown at exit aborts some runs (also with DCP's FileSystemWriter)
