"""diffscore.export"""
