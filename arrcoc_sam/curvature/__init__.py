"""Measuring flatness: HVPs, exact Hessians, eigenvalues, trace/diagonal estimators, sharpness measures."""
