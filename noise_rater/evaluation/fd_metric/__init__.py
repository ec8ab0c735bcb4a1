"""The FD / KID ``evaluate`` metric of NoiseRater: ``evaluate.load(noise_rater.evaluation.FD_METRIC_PATH)``.

The script ``fd_metric.py`` in this folder is what ``evaluate.load`` imports; this file only makes the folder a
package (so that it is installed with ``noise_rater``).
"""
