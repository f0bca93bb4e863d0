"""The ``jaxmia`` command's subcommands, one module each, named like the stage it runs.

A command module defines ``add_arguments(parser)`` and ``run(args, config)``: it only turns
arguments into a call of its library stage (``jaxmia.stages.train.run``,
``jaxmia.stages.invert.run``,
``jaxmia.stages.evaluate.run``, ``jaxmia.stages.experiment.run``, ``jaxmia.stages.clone.run``,
``jaxmia.stages.prior.run``). No library module imports this package.
"""
