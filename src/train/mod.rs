//! Training: data pipeline, learning-rate schedules, optimizers.

pub mod data;
pub mod schedule;
