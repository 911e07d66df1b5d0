import streamlit as st
st.title("validation")
st.info("Coming soon.")
