//! Documents as well as photos: PDF uploads checked and rendered into page images (in a child
//! process, bounded in time and memory), the pages a request selects, and the boxes the model
//! writes mapped back onto the caller's image or page.

pub mod boxes;
pub mod isolated;
pub mod pages;
pub mod pdf;
