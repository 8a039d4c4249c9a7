"""Segmentation evaluation: metrics, size-stratified reports, statistics (see docs/evaluation.md).

Submodules are imported explicitly (``nnunet_synth.evaluation.evaluate`` etc.) so that importing the
package stays cheap.
"""
