"""Evaluation: metrics, the feature network that judges, the protocol, the comparison and its report.

- metrics.py: FD, KID, precision/recall/density/coverage, class histogram, memorisation, MSE/PSNR/SSIM;
- features.py: the evaluation classifier, trained once per dataset and cached;
- protocol.py: EvalContext, the one way every model and reference row is measured;
- compare.py: run_comparison, the comparison as a library function;
- report.py: metrics.json, report.md and the self-contained report.html;
- trained_run.py: sample / reconstruct / evaluate one finished run.
"""
