"""diffscore.reference"""
