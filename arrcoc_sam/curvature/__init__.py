"""Measuring flatness: HVPs, exact Hessians, eigenvalues, trace/diagonal estimators, sharpness measures.

One abstraction: a curvature matrix (Hessian or GGN/Fisher, w.r.t. weights or any leaf tensor such as
token features) is a linear operator (:mod:`.operators`); the estimators (:mod:`.eigen`, :mod:`.estimators`)
take any operator; the model-level functions (:mod:`.api`, :mod:`.sharpness`) build one and run an estimator
inside :func:`probe_context`, which leaves the model exactly as found. No transformers import here.
"""

from arrcoc_sam.curvature.api import (
    curvature_operator,
    exact_hessian,
    hessian_diagonal,
    hessian_trace,
    hessian_vector_product,
    top_eigenvalues,
)
from arrcoc_sam.curvature.eigen import EigenResult, lanczos, power_iteration
from arrcoc_sam.curvature.estimators import (
    Estimate,
    control_variate_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)
from arrcoc_sam.curvature.operators import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
)
from arrcoc_sam.curvature.probe import BlockSampler, GeneratorSampler, ProbeSampler, probe_context
from arrcoc_sam.curvature.sharpness import (
    PacBayesBound,
    adaptive_sharpness,
    average_sharpness,
    pac_bayes_bound,
    sam_sharpness,
)

__all__ = [
    "BlockSampler",
    "CurvatureOperator",
    "EigenResult",
    "Estimate",
    "GGNOperator",
    "GeneratorSampler",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "PacBayesBound",
    "ProbeSampler",
    "adaptive_sharpness",
    "average_sharpness",
    "control_variate_diagonal",
    "curvature_operator",
    "exact_hessian",
    "ggn_diagonal",
    "hessian_diagonal",
    "hessian_trace",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "pac_bayes_bound",
    "power_iteration",
    "probe_context",
    "sam_sharpness",
    "top_eigenvalues",
]
