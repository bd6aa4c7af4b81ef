"""diffscore.engine"""
