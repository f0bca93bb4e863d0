"""The ``jaxmia`` command's subcommands, one module each, named like the stage it runs.

A command module defines ``add_arguments(parser)`` and ``run(args, config)``: it only turns
arguments into a call of its library stage (``jaxmia.train.run``, ``jaxmia.invert.run``,
``jaxmia.evaluation.run``, ``jaxmia.experiment.run``, ``jaxmia.cloning_study.run``,
``jaxmia.prior_training.run``). No library module imports this package.
"""
