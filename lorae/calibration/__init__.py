"""Post-hoc calibration: temperature scaling (paper appendix K) and reliability diagrams."""

from __future__ import annotations

from lorae.calibration.callback import CALIBRATED_PREFIX, TemperatureScaling
from lorae.calibration.reliability import ReliabilityBins, reliability_figure
from lorae.calibration.temperature import TemperatureFit, fit_temperature

__all__ = [
    "CALIBRATED_PREFIX",
    "ReliabilityBins",
    "TemperatureFit",
    "TemperatureScaling",
    "fit_temperature",
    "reliability_figure",
]
