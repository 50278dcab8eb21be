"""Text corpora, calibration sampling and chat/instruction data."""
