"""The lab: everything that trains and studies models with the core (models, data, loop, sweeps, studies).

It may change freely; `import bnjax` (the functional core) never imports it.
"""
