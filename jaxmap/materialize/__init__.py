"""materialize"""
