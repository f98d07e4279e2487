"""tierckpt benchmarks: DCP + FSDP2 save/load throughput and training-step overhead.

``python -m benchmarks.run`` compares tierckpt with DCP's FileSystemWriter, torch.save and
the memcpy ceiling in one run; ``python -m benchmarks.step_overhead`` measures what
checkpointing every step costs a training loop. See benchmarks/README.md.
"""
