//! Tags: bundles on disk, the hot-reloading registry, prompt templates, and composing
//! templates + tags + inputs into model input.

pub mod bundle;
pub mod compose;
mod files;
pub mod registry;
pub mod seed;
pub mod template;

pub use bundle::{
    regression_value, BaseModelIdentity, Head, HeadSpec, TagBundle, TagKind, TagManifest,
};
pub use registry::{Registry, ReloadReport, TagSet, TagsWatch};
pub use template::{Segment, Template};
