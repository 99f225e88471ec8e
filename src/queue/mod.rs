//! How tasks reach projectors. Without a broker, the in-process [`dispatcher`] feeds each enabled
//! projector from the journal in sequence order. With one (`QUEUE_CONNECTIONSTRING`), [`rabbitmq`]
//! relays the journal's tasks through RabbitMQ to consumers in this process or in `dstore worker`
//! processes. Both apply tasks by the same [`step`] rule.

pub mod dispatcher;
pub mod hold;
pub mod rabbitmq;
pub mod step;
pub mod view;
