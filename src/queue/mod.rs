//! How tasks reach projectors. The in-process [`dispatcher`] feeds each enabled projector from the
//! journal in sequence order.

pub mod dispatcher;
