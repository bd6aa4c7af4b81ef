"""diffscore.calibration"""
