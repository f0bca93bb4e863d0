"""The library stages the commands call, one module per command (``stages/clone.py`` is
``jaxmia clone``). Nothing below this package imports it."""
