//! Tags: bundles on disk, the hot-reloading registry, prompt templates.

pub mod bundle;
pub mod registry;
pub mod template;

pub use bundle::{BaseModelIdentity, Head, HeadSpec, TagBundle, TagKind, TagManifest};
pub use registry::{Registry, ReloadReport, TagSet};
pub use template::{Segment, Template};
