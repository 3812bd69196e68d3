pub use candle_core as candle;
