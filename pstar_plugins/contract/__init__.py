"""The bottom layer: what a method is (spec, config, the module contract) and the errors.

Nothing here imports another part of the package; every other layer builds on these names
(docs/design.md, "Layers").
"""
