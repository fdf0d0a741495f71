"""One trainer for every stage: meshes and sharding rules, optimizer, Orbax checkpoints, the loop."""
