"""The benchmark harness: every script in ``benchmarks/`` is orchestration over these modules.

- :mod:`.inputs`: the one ``make_inputs`` and the dtype names.
- :mod:`.timing`: ``time_call`` / ``timeit`` (CUDA events or the wall clock, medians, warm-up), phase marks, the
  GEMM floor and the dense matmul rate.
- :mod:`.memory`: peak-memory probes (CUDA allocator statistics; the CPU's resident set) and ``step_peak``.
- :mod:`.runner`: fresh-process cells (subprocess with a JSON result, or a fork), alternating rounds, budgets,
  deadlines, the test suite in a subprocess.
- :mod:`.cells`: in-process cells (a loss's forward/backward/step, a scoring pass, a step closure).
- :mod:`.variants`: the registry of implementations at equal semantics (the library's backends, torch.compile
  baselines, TRL and Liger where installed) and the step closures.
- :mod:`.report`: Markdown tables and cell texts, the environment header, the report file, JSON, figures.
- :mod:`.lib`: the only imports of tipkernels internals.
"""
