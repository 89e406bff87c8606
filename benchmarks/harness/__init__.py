"""What the benchmark scripts beside this package share, so each script answers one question.

- :mod:`harness.workload`: what the start-up and throughput benchmarks train (the digits example's MLP on generated,
  digits-shaped data);
- :mod:`harness.lightning_runs`: one process, Lightning's ``ddp_spawn`` and raylane running that workload;
- :mod:`harness.ray_train_runs`: Ray Train's ``TorchTrainer`` running it;
- :mod:`harness.ray_start`: what starting Ray costs a script, in fresh interpreters;
- :mod:`harness.timer`: the training loop's time on rank 0, told apart from start-up;
- :mod:`harness.report`: medians, ratios, the machine and its load, the JSON file;
- :mod:`harness.memory`: the memory benchmarks' workload, per-worker measurement and table.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``; raylane's workers get
the driver's ``sys.path``, so they import these modules by name too.
"""
