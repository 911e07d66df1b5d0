import streamlit as st
st.title("report")
st.info("Coming soon.")
