"""Tasks: what one subcommand does, from validated options to results (and files, when asked).

One module per subcommand (``disagree``, ``neuron`` with ``neurons``, ``uvce``,
``neuron_cf``), and the rooms they share: ``runtime`` (options, device, dtype, the
progress protocol, checks, the run record), ``seed_runs`` (the seed-batch loop),
``folder_runs`` (work items, CSV, the resumable sharded loop), ``real_images`` (load,
invert with the cache, mask) and ``neuron_target`` (a neuron or a feature direction).
No task module imports another task module. A task loads models (``models``), hands an
objective to the engine (``engine``), writes through ``io`` and tells a progress
reporter what happens; it prints nothing itself.
"""
