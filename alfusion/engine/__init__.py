"""The training engine: one LightningModule that trains a bank of G >= 1 probes."""

from alfusion.engine.data import ImageData, TensorSteps, TokenData
from alfusion.engine.fit import FitResult, fit_bank
from alfusion.engine.module import BankModule
from alfusion.engine.step import BankStep
from alfusion.engine.stream import StreamedTokens

__all__ = ["BankModule", "BankStep", "FitResult", "ImageData", "StreamedTokens", "TensorSteps",
           "TokenData", "fit_bank"]
