pub mod bench;
pub mod check;
pub mod convert;
pub mod info;
pub mod make_input;
pub mod make_layer;
pub mod run;
