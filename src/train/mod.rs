//! Training: data pipeline, learning-rate schedules, optimizers.

pub mod adam8bit;
pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod optim;
pub mod options;
pub mod pack;
pub mod records;
pub mod schedule;
pub mod step;
pub mod stream;
pub mod trainer;
