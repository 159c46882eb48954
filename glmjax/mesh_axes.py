"""The mesh axis names, defined once. The model code (glmjax/moe.py) names the expert axis
from here, and `glmjax.sharding` builds on it: the model never imports the sharding package."""

DATA = 'data'  # batch rows (replicas of the whole model when nothing else uses the devices)
EXPERT = 'expert'  # routed experts: the MoE layers run expert-parallel over it (shard_map)
TENSOR = 'tensor'  # attention heads and FFN width, partitioned by the compiler
MESH_AXES = (DATA, EXPERT, TENSOR)
