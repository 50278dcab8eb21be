"""Speculative decoding: drafting heads (Medusa, Amphista), their training, trees and decoding."""
