"""The condensation methods. Importing this package registers each of them (:mod:`builders.registry`);
a new method is one module here (its class decorated with ``@register``) plus one recipe."""

from builders.methods import coreset, datm, dc, dd, dm, dq, mtt  # noqa: F401 - each module registers its methods
