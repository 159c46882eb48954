"""The mesh axis names, defined once. This module imports nothing, so that the model code
(glmjax/moe.py) can name the expert axis without importing the rest of `sharding`."""

DATA = 'data'  # batch rows (replicas of the whole model when nothing else uses the devices)
EXPERT = 'expert'  # routed experts: the MoE layers run expert-parallel over it (shard_map)
TENSOR = 'tensor'  # attention heads and FFN width, partitioned by the compiler
MESH_AXES = (DATA, EXPERT, TENSOR)
